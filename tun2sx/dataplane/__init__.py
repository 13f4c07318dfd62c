"""The data plane: packets in from the TUN, flows out to the outbounds.

`tun` opens the device, `engine` drives the sans-I/O stack from one task,
`context` is the view of the engine that flows get, `tcpstream` turns a
stack connection into a trio stream, `tcpflow` and `udpflow` run one flow
each, `splice` copies bytes between the two sides of a TCP flow, and
`dnsserve` answers the DNS queries that arrive through the TUN.
"""
