from medseg.cli import console_main

console_main()
