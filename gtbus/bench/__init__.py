"""Benchmarks behind ``gtbus bench``: each prints a table and keeps its numbers in bench/results/.

* :mod:`gtbus.bench.bus`: signed request/reply and one-way throughput over loopback, next to raw ZeroMQ.
* :mod:`gtbus.bench.travel`: the talk's transfer-share table (ship vs travel per buffer cap) and the
  encrypted provisioning rate of a 512 MiB chunk next to plain memcpy.
* :mod:`gtbus.bench.report`: machine information, tables, and the .md/.json result files.

Numbers are measured, printed and kept; no test asserts a wall-clock limit.
"""
