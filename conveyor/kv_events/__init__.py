"""vLLM-format KV cache events: the config (``config.py``, pure Python), the msgpack wire format
(``wire.py``) and the ZMQ publisher thread (``publisher.py``, needs the ``kv-events`` extra).

The events themselves are produced as plain data in ``conveyor.core.kv_events``; importing this
package imports neither zmq nor msgpack.
"""
