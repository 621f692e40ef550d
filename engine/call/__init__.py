"""One call's life on the outbound socket: channel data in, decision rendered, session followed.

* :mod:`engine.call.channel`: CHANNEL_DATA headers -> the rules' CallRequest;
* :mod:`engine.call.render`: a structured decision -> FreeSWITCH commands and dial strings;
* :mod:`engine.call.session`: the conversation with FreeSWITCH as a sans-I/O state machine;
* :mod:`engine.call.driver`: the thin gevent driver (socket, deadlines, metrics, logs).
"""
