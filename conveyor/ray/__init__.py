"""conveyor on Ray Serve: N engine replicas behind one OpenAI API (``pip install 'conveyor[ray]'``).

Importing this package does not import Ray; the modules that need it import it themselves.
"""
