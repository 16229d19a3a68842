from common.cli import run_main
from tiny_world.build import main

run_main(main)
