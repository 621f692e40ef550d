"""FreeSWITCH learns callgate's SIP devices and sofia gateways over mod_xml_curl.

``callgate fsxml`` answers mod_xml_curl's requests from the engine's in-memory snapshot
(:class:`engine.state.watcher.SnapshotHolder`, kept current by the live sync); no answer
queries PostgreSQL. The snapshot holds no clear secret: devices come with their a1-hash, and
the gateways' carrier passwords are read from PostgreSQL apart, on change:

* ``request``: mod_xml_curl's form fields -> a :class:`~engine.fsxml.request.Lookup` (pure);
* ``render``: the XML documents, every value escaped (pure);
* ``directory``: the index the answers come from, updated in place by the holder;
* ``access``: the source allow-list and HTTP basic auth (pure);
* ``credentials``: the carrier passwords, read at start and on each gateway change;
* ``server``: the WSGI application and the gevent server around them.

docs/freeswitch.md says what it serves, what FreeSWITCH needs besides, and why.
"""
