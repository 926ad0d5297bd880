"""Alerts: a tiny ``Notifier`` interface and a do-nothing default (``base``), a factory from
settings (``factory``), the targets' formats and delivery (``formats``, ``dispatch``) and the courier
that delivers the durable outbox (``courier``).

Import from the submodules: this package's init imports nothing, so a submodule importing a sibling
never runs the init that imports it back (the old re-exports made ``dispatch`` -> package init ->
``factory`` -> ``dispatch`` a cycle).
"""
