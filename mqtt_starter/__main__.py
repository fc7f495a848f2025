from mqtt_starter.cli import main

raise SystemExit(main())
