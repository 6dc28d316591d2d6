"""Plan model, validation and scheduling decisions: pure logic, no I/O."""
