/* fault: triple-fault on purpose (zero-limit IDT, then #UD). */
#include "rt/rt.h"

int main(void)
{
    printf("fault: about to triple-fault\n");
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) empty = {0, 0};
    __asm__ volatile("cli; lidt %0; ud2" : : "m"(empty));
    /* not reached: #UD -> #GP -> #DF -> shutdown */
    printf("fault: still alive?!\n");
    return 1;
}
