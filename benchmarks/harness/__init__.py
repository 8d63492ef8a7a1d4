"""Harness for the serving benchmarks and end-to-end tests (not shipped in the wheel): ``server``
starts and stops a real ``vllm serve`` process, ``load`` sends it bursts of requests and accounts
for them. Benchmarks import it as ``harness`` (their folder is on ``sys.path``); so do the tests
(``tests/conftest.py`` puts ``benchmarks/`` there)."""
