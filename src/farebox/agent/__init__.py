"""The agent side: pay for HTTP APIs that answer 402, within a policy and a budget."""
