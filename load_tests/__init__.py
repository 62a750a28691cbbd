"""Load tests (Locust) and control-plane benchmarks of CyxWiz.

- :mod:`load_tests.locustfile`: node and client users that speak only the public contract.
- :mod:`load_tests.run`: a bounded headless Locust run against a local stack (or ``--host``).
- :mod:`load_tests.bench`: side-by-side control-plane benchmarks, JSON + PNG.
"""
