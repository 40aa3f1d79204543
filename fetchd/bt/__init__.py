"""BitTorrent for fetchd (issue 12): deterministic per-blob torrents (metainfo.py), the one
libtorrent session of a process, bridged to asyncio (session.py; nothing else imports
libtorrent), and the swarm as a Fetcher (fetchd/sources/swarm.py)."""
