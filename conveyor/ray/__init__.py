"""conveyor on Ray Serve: N engine replicas behind one OpenAI API (``pip install 'conveyor[ray]'``).

Importing this package does not import Ray; the modules that need it import it themselves.
"""

__all__ = ["build_app", "app_builder"]


def __getattr__(name: str):
    if name in __all__:
        from conveyor.ray import app
        return getattr(app, name)
    raise AttributeError(f"module 'conveyor.ray' has no attribute {name!r}")
