/*
 * A stand-in for Windows' bcryptprimitives.dll, for Wine 8 only.
 *
 * Rust's std (>= 1.78) imports ProcessPrng from bcryptprimitives.dll, which
 * Windows 10+ has and Wine 8.0 lacks: every Rust .exe then fails to load
 * (exit code 53, no output). This DLL exports ProcessPrng on top of
 * BCryptGenRandom (the system RNG, as the real one is). scripts/wine-prefix.sh
 * builds it with mingw and copies it to the prefix's system32. It is never
 * shipped to a real Windows target.
 */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG)))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
