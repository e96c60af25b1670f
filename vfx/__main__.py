from vfx.cli import main

main()
