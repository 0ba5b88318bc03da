import sys

from ptune_rt.gpu_check.run import main

sys.exit(main())
