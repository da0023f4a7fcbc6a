"""A worker module with a mistake: a class decorated with ``@worker`` but without ``process``."""

from obanpro import worker


@worker(queue="default")
class NoProcess:
    pass
