"""Ledgers: where money moves. EVM JSON-RPC settlement and the embedded development chain."""
