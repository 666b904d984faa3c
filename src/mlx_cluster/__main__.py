from mlx_cluster.cli import main

raise SystemExit(main())
