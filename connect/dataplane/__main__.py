import sys

from connect.dataplane.process import main

sys.exit(main())
