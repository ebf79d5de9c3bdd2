"""Tools built on the broker, each run as a process of its own.

``bench`` (the benchmark), ``loadgen`` (its load generator), ``sink`` (its
baseline receivers) and ``noloss`` (the no-loss checker). Nothing below this
package imports it: the broker, the clients and ``import trio_embarcadero``
never load a tool.
"""
