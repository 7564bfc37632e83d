from nclab.cli import main

raise SystemExit(main())
