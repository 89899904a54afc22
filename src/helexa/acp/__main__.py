from helexa.acp.cli import main

raise SystemExit(main())
