"""Pure ticket logic: models, state machine, validation, page tokens. No I/O."""
