"""Names: the fake-IP DNS, the store of fake addresses, and the rules.

`dns` is the codec and the fake-IP answerer, `fakeip` keeps the
address-to-name table, and `router` picks an outbound for a destination.
Serving the queries that arrive through the TUN is the data plane's
(`dataplane.dnsserve`).
"""
