"""Entry point: `python train.py [CONFIG.yaml] [--key=value ...]` or
`accelerate launch [accelerate flags] train.py CONFIG.yaml [...]`. With no config it runs configs/demo.yaml."""
import sys

from llm_dist.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
