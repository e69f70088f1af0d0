"""kdserve: the wire protocol (generated code in ``kdserve.v1``), its tensor codec and the registry."""
