"""Sans-I/O network stack: wire formats, TCP, UDP, ICMP and the demultiplexer.

Nothing in this package performs I/O, reads a clock or draws random numbers:
time and initial sequence numbers are arguments, so every behaviour can be
driven segment by segment from a test.
"""
