import sys

from .worker_count import main

sys.exit(main())
