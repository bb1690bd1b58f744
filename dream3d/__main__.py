from dream3d.cli import main

main()
