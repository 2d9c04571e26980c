"""A GDB remote-serial-protocol stub for a partition.

protocol.py frames and parses packets (pure), x86_64.py knows GDB's x86-64 register
layout and target description, target.py is the debug target over a running Machine
(registers, memory, breakpoints, all-stop execution control) and server.py serves one
GDB client at a time over TCP.
"""
