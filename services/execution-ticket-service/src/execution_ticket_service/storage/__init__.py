"""PostgreSQL and MongoDB adapters. Driver exceptions never leave this package."""
