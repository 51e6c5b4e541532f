from nvfp4q.cli import main

main()
