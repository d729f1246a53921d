"""The driver: the code that runs inside the environment (sandbox).

It loads the function's code as a module, gives it the ``api`` global, calls
the entry, and reports the outcome to the exchange. It imports nothing of
bento (it runs inside the sandbox) and nothing outside the stdlib: the
project's CBOR codec (``cbor``) and internal wire (``wire``) live in this
package, and the exchange and the server import them from here.

Wire between exchange and driver (fds 3 and 4 of the driver): messages framed
by ``wire.Framer``, each one CBOR map of a type listed in ``wire.MESSAGES``
(``api.send`` excepted: a tagged body, see ``wire.SEND_TAG``). stdout and
stderr stay plain pipes, so ``print()`` cannot corrupt this framing.
"""
