"""The driver: the code that runs inside the environment (sandbox).

It loads the function's code as a module, gives it the ``api`` global, calls
the entry, and reports the outcome to the exchange. It imports nothing of
bento (it runs inside the sandbox): stdlib and cbor2 only.

Wire between exchange and driver (fds 3 and 4 of the driver): messages framed
as a 4-byte big-endian length followed by one CBOR map. Exchange → driver:
``start``, ``in``, ``eof``, ``state``, ``put``. Driver → exchange: ``send``,
``get``, ``put``, ``exit``. stdout and stderr stay plain pipes, so ``print()``
cannot corrupt this framing.
"""
