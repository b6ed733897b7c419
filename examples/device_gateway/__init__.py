"""keepconn's example MQTT 3.1.1 device gateway, and the device fleet that exercises it.

The gateway: ``gateway`` (the program), ``sessions`` (its MQTT session logic), ``mqtt_codec`` (a
sans-I/O MQTT 3.1.1 codec, whose parts are ``mqtt_packets``, ``mqtt_parsers``, ``mqtt_decoder``
and ``mqtt_encoder``), ``sink`` (where telemetry goes), ``status`` (the loopback status page) and
``topics`` (subscription matching). The device-fleet simulator that the demo and the benchmarks
drive: ``fleet`` (the coordinator and its command line), ``fleet_device`` (one device),
``fleet_worker`` (the worker process), ``fleet_cells`` (network namespaces, root only) and
``gateway_process`` (the gateway run as a subprocess). See README.md beside this file.

This file imports nothing on purpose: ``gateway.py`` and ``fleet.py`` also run as scripts, and
an import here would load a second copy of a module that is already running as ``__main__``.
"""
