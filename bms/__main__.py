from bms.cli import main

raise SystemExit(main())
