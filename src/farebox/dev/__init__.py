"""What development needs and production does not.

The embedded EVM (:mod:`farebox.dev.devchain`, served over JSON-RPC by :mod:`farebox.dev.rpc_server`
as ``farebox devchain``) with its token (:mod:`farebox.dev.contracts`), anvil driven from Python
(:mod:`farebox.dev.anvil`), a local stand-in for Stripe's API (:mod:`farebox.dev.devstripe`,
``farebox devstripe``), and the sample paid API and the demo (:mod:`farebox.dev.sample`,
:mod:`farebox.dev.demo`, ``farebox demo``). Nothing here is exported from :mod:`farebox`, and this
package imports nothing: ``farebox.testing`` reaches the Stripe stand-in without loading a chain.
"""
