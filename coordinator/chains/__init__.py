"""Chains: stages run one after another at one service address, each handing its state to the next
(docs/chains.md): the manifest, the state table, the store protocol and the manager."""
