from rose.cli import main

raise SystemExit(main())
