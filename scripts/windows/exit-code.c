/*
 * A tiny installer stand-in for the Windows tests: exits with the code given
 * as its first argument (default 0), after sleeping the milliseconds given as
 * its second (default 0). Built with mingw by scripts/wine-prefix.sh.
 */
#include <stdlib.h>
#include <windows.h>

int main(int argc, char **argv)
{
    if (argc > 2)
        Sleep((DWORD)strtoul(argv[2], NULL, 10));
    return argc > 1 ? atoi(argv[1]) : 0;
}
