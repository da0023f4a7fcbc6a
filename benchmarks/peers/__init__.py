"""One small module per tool: its worker code (same semantics for every tool) and a driver adapter.

These modules are imported inside each tool's own virtual environment, so this
package and `work` use the standard library only.
"""
