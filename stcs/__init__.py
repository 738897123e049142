"""stcs: a single-tenant Chroma server.

Every end user of an application gets their own real Chroma server (``chroma run --path
<dbPath>/<userId>``), started on demand and stopped when idle, behind one authenticated HTTP
endpoint that the unmodified ``chromadb.HttpClient`` talks to.
"""

__version__ = "0.1.0"
