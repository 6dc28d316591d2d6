"""Test support for Hive Flow C: the services and reference workers in-process, with
settings suited to tests (``hive_testsupport.settings``, ``hive_testsupport.inprocess``),
and the pytest plugin giving tests real databases (``hive_testsupport.databases``).

Used by the service tests' conftest files; never a runtime dependency of a service.
Import from the submodules: pytest loads the database plugin in every test run, and
importing this package must not import every service with it.
"""
