from jaxlens.cli import main

raise SystemExit(main())
