"""`python -m medlora …` is the `medlora` command (also for `torchrun -m medlora` / `accelerate launch -m medlora`)."""

from medlora.cli import main

main()
