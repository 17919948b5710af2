from gmm_quant import cli
from gmm_quant.reuse.command import main

cli.exit_now(main())
