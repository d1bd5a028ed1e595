"""The web view (`vmh ui`): what the streams show, the standing queries, match events with the key frames of their
moments, and retrospective search. ``view`` holds the state built from the bus, ``app`` serves it over HTTP with
server-sent events, ``static`` is the page (plain HTML and JavaScript, no build step)."""
