"""The network-namespace lab that `tun2sx demo`, the end-to-end tests and
the benchmarks build their test networks with (`netns`), and the demo."""
