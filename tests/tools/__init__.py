"""Test tooling run by path or imported by the tests (tests/ is on sys.path): the loader fuzzer."""
