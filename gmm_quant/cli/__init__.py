"""The command lines (argparse mains over the library): train, tune, export, sensitivity, reuse."""
