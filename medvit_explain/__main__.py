from medvit_explain.cli import main

main()
